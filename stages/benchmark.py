"""benchmark stage: inference throughput and latency per batch size -> metrics/benchmark.json.

Run by DVC (`dvc repro benchmark`). Timings are the pipeline's only non-deterministic outputs.
"""

from pathlib import Path

import torch

from pcam.benchmark import time_inference
from pcam.checkpoint import load_checkpoint, load_model
from pcam.errors import exit_on_user_error
from pcam.fileio import write_json
from pcam.params import load_params
from pcam.provenance import device_info, library_versions

MODEL = Path("models/model.pt")
METRICS = Path("metrics/benchmark.json")


@exit_on_user_error
def main() -> None:
    p = load_params().benchmark
    torch.set_num_threads(p.threads)
    model = load_model(load_checkpoint(MODEL), MODEL)
    device = torch.device("cpu")
    rows = [time_inference(model, bs, p.warmup, p.repeats, device) for bs in p.batch_sizes]
    for r in rows:
        print(
            f"benchmark: batch {r['batch_size']:4d}: {r['images_per_s']:8.0f} img/s, "
            f"p50 {r['latency_ms_p50']:.2f} ms"
        )
    write_json(
        METRICS,
        {
            "best_inference_images_per_s": max(r["images_per_s"] for r in rows),
            "inference": {f"cpu_fp32_bs{r['batch_size']}": r for r in rows},
            "machine": device_info(device) | {"versions": library_versions()},
        },
    )


if __name__ == "__main__":
    main()
