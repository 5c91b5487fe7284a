"""The process around the app: JSON logs, metrics, the request log, the body
guard, CORS and the checks run before serving. `logs` imports only the
standard library (gunicorn's master loads it)."""
