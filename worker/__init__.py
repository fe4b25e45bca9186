"""gptqd workers: the Celery app, its tasks, and the GPTQ engine (worker.gptq)."""
