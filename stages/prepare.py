"""prepare stage: write the PCAM files into data/raw from the source chosen by data.source.

`synthetic` (src/pcam/synthetic.py) generates the embedded default dataset with known defects
injected (data.synthetic.defects.*) and their indices in data/raw/synthetic_defects.json, which
no stage reads: tests and benchmarks measure validate-data against it. `pcam`
(src/pcam/download.py) downloads the official files from Zenodo (resumable, md5-checked), or
copies them from a file:// URL; the meta CSVs are optional there.
"""

from pathlib import Path

from pcam import h5io, synthetic
from pcam.download import download_pcam, load_checksums
from pcam.errors import exit_on_user_error
from pcam.fileio import write_json
from pcam.params import load_params

RAW_DIR = Path("data/raw")
# Downloads resume from here; outside data/raw because DVC deletes a stage's outputs before a run.
DOWNLOAD_CACHE = Path(".cache/pcam")


@exit_on_user_error
def main() -> None:
    p = load_params().data
    if p.source == "pcam":
        md5 = load_checksums(p.pcam.checksums)
        download_pcam(
            RAW_DIR,
            p.pcam.base_url,
            md5=md5,
            cache_dir=DOWNLOAD_CACHE,
            timeout_s=p.pcam.timeout_s,
            retries=p.pcam.retries,
        )
        return
    s = p.synthetic
    sizes = {split: getattr(s, f"n_{split}") for split in h5io.SPLITS}
    truth, donors = {}, {}
    for i, split in enumerate(h5io.SPLITS):  # train first: valid/test receive copies of it
        slides = synthetic.slide_ids_for(split, getattr(s, f"slides_{split}"))
        data = synthetic.generate_split(sizes[split], slides, s.seed + i, s.hard_negative_fraction)
        truth[split] = synthetic.inject(split, data, s.defects, s.seed, donors.get(split))
        h5io.write_split(RAW_DIR, split, data.x, data.y, data.meta)
        if split == "train":  # taken now, so that train need not stay in memory
            counts = {
                k: synthetic.defect_count(s.defects.cross_split_rate, sizes[k])
                for k in ("valid", "test")
            }
            donors = synthetic.take_donors(data, truth["train"], counts, s.seed)
        found = ", ".join(f"{k} {len(v)}" for k, v in truth[split].items())
        print(
            f"prepare: {split}: {len(data.y)} patches, {int(data.y.sum())} positive; defects: {found}"
        )
    write_json(RAW_DIR / "synthetic_defects.json", synthetic.ground_truth(s.defects, s.seed, truth))


if __name__ == "__main__":
    main()
