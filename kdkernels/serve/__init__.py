"""`kdk serve-teacher`: a teacher causal LM behind HTTP (FastAPI + uvicorn, the `[serve]`
extra), for served-teacher distillation. Application layer: it may import kdkernels.train
(the embedded `default` teacher); nothing below the application imports it.

- model.py: load the teacher and run its forwards;
- scoring.py: chunked log-probs, top-K, ranks and sampling from hidden states;
- batcher.py: one worker thread, concurrent requests merged per forward;
- generation.py: one prompt's generation, a step at a time;
- protocol.py: request validation and response JSON (vLLM's shapes);
- app.py: the routes; main.py: the socket, the announcement and uvicorn.
"""
