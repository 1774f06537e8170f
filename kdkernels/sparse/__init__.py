"""Sparse teachers: distillation from the teacher's top-K (or sampled) log-probs.

The student side stays fused and chunked (full-vocabulary log-normalisers and the student
logits gathered at the teacher's ids); the teacher side is K (id, log-prob) pairs per token.
``tails.py`` holds the math of each tail rule, ``teacher.py`` the checks and the tempered
teacher, ``rows.py`` the chunk driver, ``api.py`` the public functions.
"""
