"""Reading shards, the exact survey-mixing sampler, DALI and torch decode/augment pipelines."""
