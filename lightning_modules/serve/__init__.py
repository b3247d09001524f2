"""The web demo and HTTP API of `prd serve`: `requests.py` checks one request's inputs (prompt, seed, grid
resolution, format) into a `MeshRequest` or a one-line `RequestError`; `model.py` holds the student, loaded once,
and turns a request into files inside one output folder (mesh, GLB for the viewer, turntable) with per-stage
timings; `app.py` builds the gradio page and the `POST /generate` route on one FastAPI app; `command.py` is the
command line (weights as `prd generate`, else the CPU demo's student)."""
