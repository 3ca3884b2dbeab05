"""Evaluation: benchmarks (shipped prompts), evaluate (both decoders on the same prompts), metrics,
report (results.md + PNGs), run (`deepspec eval`), calibrate (`deepspec eval calibrate`, STS),
profile (`deepspec eval profile`, SPS(B) + load simulation), setup (config -> typed objects).
The decoding itself lives in deepspec.decoding (engine, target_runner, sampling)."""
