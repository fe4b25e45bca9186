"""The GPTQ engine: a plain library (torch + transformers), no Celery, FastAPI or SQL.

quantizer    scale/zero per group, quantize and dequantize
gptq         the solver for one linear layer (Frantar et al. 2022)
packing      int32 bit packing of codes and zeros (GPTQ checkpoint format)
arch         where the decoder blocks and linear layers are for each model family
calibration  text source -> tokenized windows
pipeline     block-by-block quantization of a whole model
export       write the GPTQ checkpoint; loader reads one back
evaluate     perplexity, agreement with the original, sample text
api          quantize(): the one call the CLI and the worker make
"""

__version__ = "0.1.0"
