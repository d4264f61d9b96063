"""Probing a frozen encoder (METHOD.md, "Probing"), read top-down:

- `cli`: `xtra probe MODEL`: plans the jobs, checks their inputs, runs them (Ray or in process);
- `config`: one typed `ProbeConfig` per (model, benchmark) job, built from params;
- `job`: one job per (model, benchmark): features, every kind's head bank, selection, results;
- `data`: splits, the per-kind training transforms, augmentation seeded per (seed, epoch, sample);
- `loop`: the one-pass training loop (one encoder forward per batch for every head of every kind);
- `state`: the resumable state of a job (`results/probe-state/<model>/<benchmark>/`);
- `dist`: multi-device jobs (torch.distributed, synchronised BatchNorm statistics);
- `driver`: Ray tasks and in-process runs with retries, failure records;
- `pixels`: the pixel floor, a "model" whose features are the normalised pixels.
"""
