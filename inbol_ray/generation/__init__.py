"""One generate-over-items stage for confidence sampling, evaluation and the base model's test confidence.

    from inbol_ray.generation.stage import Decoding, Job, Selection, run_generation

    job = Job("sample", layout.items, layout.samples, layout.quarantine("sample"), model_dir,
              Decoding.sampled(cfg.sampling), "samples", Selection(splits=("train",)))
    result = run_generation(cfg, job)

`stage.py` holds the Ray Data pipeline and the driver-side collection, `shards.py` the shard plan, resume
and manifests, `actor.py` the Ray Data callable class over an `inbol_ray.sampling` Sampler, `grade.py` what
responses become (`samples` or `predictions`). The engines stay in `inbol_ray.sampling`. Nothing is
imported here, so `generation.shards` stays light (no torch) for its other users.
"""
