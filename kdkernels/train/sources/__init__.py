"""Where a run's models and data come from: the embedded default (stdlib corpus, local BPE,
small Llamas, the cached teacher), --teacher/--student, --data, --prompts, a teacher-logit
cache, and the inputs of `kdk cache-teacher`."""
