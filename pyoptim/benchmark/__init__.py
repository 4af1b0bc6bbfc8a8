"""Benchmarks of pyoptim's ops against torch's, with the machine's measured memory bandwidth as the roofline.

    python -m pyoptim.benchmark --model resnet50            # an optimizer step over a model's parameters
    python -m pyoptim.benchmark --shapes 4096x4096,1024*24  # over a list of shapes (24 tensors of 1024)
    python -m pyoptim.benchmark --state-dict model.pt       # over a saved state_dict's floating tensors
    python -m pyoptim.benchmark --layer-norm 8192x1024 --batch-norm 64x64x56x56

harness.py is the method (bandwidth, interleaved CPU timing, CUDA events, JSON
and PNG), ops/ the benchmarked ops, models.py the parameter shapes of
well-known models, cli.py the user's command line. The project's own run,
with its fixed cases, is benchmarks/run.py in a checkout (`make bench`).
"""
