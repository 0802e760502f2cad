"""onnxruntime on one SqueezeNet input tensor, one thread: prints p50 and p99 in microseconds.

Usage: ort_squeezenet.py MODEL.onnx INPUT.npy SECONDS (the second anchor of bench/classify.sh).
"""
import sys
import time

import numpy as np
import onnxruntime as ort

model, tensor, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
feed = {session.get_inputs()[0].name: np.load(tensor)}
for _ in range(10):
    session.run(None, feed)
runs = []
until = time.perf_counter() + seconds
while time.perf_counter() < until:
    started = time.perf_counter()
    session.run(None, feed)
    runs.append((time.perf_counter() - started) * 1e6)
runs.sort()
print(runs[len(runs) // 2], runs[min(len(runs) - 1, int(len(runs) * 0.99))])
