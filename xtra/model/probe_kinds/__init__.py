"""The probe kinds, one module each; each registers its kind in `xtra.model.probes.PROBE_KINDS`, which
imports every module here on first use (adding a kind is adding a module: `docs/extending.md`)."""
