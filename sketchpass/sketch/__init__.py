"""Pure tensor math: seeded sketches (:mod:`.random`), fits (:mod:`.fit`) and counts (:mod:`.cost`).

Nothing here imports torch.fx, onnx or onnx-graphsurgeon.
"""
