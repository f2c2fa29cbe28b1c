"""prepare stage: write the PCAM files into data/raw from the source chosen by data.source.

Run by DVC (`dvc repro prepare`) from the repository root. `synthetic` generates the embedded
default dataset with known defects injected (duplicates, train copies in valid/test, blank and
black patches, backdoor triggers; data.synthetic.defects.*) and their indices in
data/raw/synthetic_defects.json, which no stage reads: tests and benchmarks measure validate-data
against it. `pcam` downloads the official files from Zenodo (resumable, md5-checked), or copies them from a
file:// URL; the meta CSVs are optional there.
"""

from pathlib import Path

from pcam import h5io
from pcam.defects import defect_count, ground_truth, inject, take_donors
from pcam.download import download_pcam, load_checksums
from pcam.errors import exit_on_user_error
from pcam.fileio import write_json
from pcam.params import load_params
from pcam.synthetic import generate_split, slide_ids_for

RAW_DIR = Path("data/raw")
DEFECTS = RAW_DIR / "synthetic_defects.json"
# Downloads resume from here; outside data/raw because DVC deletes a stage's outputs before a run.
DOWNLOAD_CACHE = Path(".cache/pcam")


@exit_on_user_error
def main() -> None:
    p = load_params().data
    if p.source == "pcam":
        download_pcam(
            RAW_DIR,
            p.pcam.base_url,
            md5=load_checksums(p.pcam.checksums),
            cache_dir=DOWNLOAD_CACHE,
            timeout_s=p.pcam.timeout_s,
            retries=p.pcam.retries,
        )
        return
    s = p.synthetic
    sizes = {"train": s.n_train, "valid": s.n_valid, "test": s.n_test}
    slides = {"train": s.slides_train, "valid": s.slides_valid, "test": s.slides_test}
    truth, donors = {}, {}
    for i, split in enumerate(h5io.SPLITS):  # train first: valid/test receive copies of it
        data = generate_split(
            sizes[split], slide_ids_for(split, slides[split]), s.seed + i, s.hard_negative_fraction
        )
        truth[split] = inject(split, data, s.defects, s.seed, donors.get(split))
        h5io.write_split(RAW_DIR, split, data.x, data.y, data.meta)
        if split == "train":
            # Taken now, so train need not stay in memory while valid/test are generated.
            counts = {
                k: defect_count(s.defects.cross_split_rate, sizes[k]) for k in ("valid", "test")
            }
            donors = take_donors(data, truth["train"], counts, s.seed)
        found = ", ".join(f"{k} {len(v)}" for k, v in truth[split].items())
        print(
            f"prepare: {split}: {len(data.y)} patches, {int(data.y.sum())} positive; defects: {found}"
        )
    write_json(DEFECTS, ground_truth(s.defects, s.seed, truth))


if __name__ == "__main__":
    main()
