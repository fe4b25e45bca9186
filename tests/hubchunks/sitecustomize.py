"""Put this folder on PYTHONPATH and huggingface_hub reports a download's bytes every MiB of a
file instead of every 10 MiB, in every process (the API, a worker, its job processes): the
tests' 20 MB models then show their progress on the way, as a real model does on a real link
(where 10 MiB pass in a second or less)."""

import huggingface_hub.constants

huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE = 1 << 20
