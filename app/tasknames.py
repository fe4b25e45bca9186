"""The names of the Celery tasks: the API sends them, the worker runs them, both read them here."""

RUN_JOB = "gptqd.run_job"
# a verification or a publication (the name is from when it ran verifications only: messages
# already queued keep it)
RUN_FOLLOW_UP = "gptqd.run_verification"
