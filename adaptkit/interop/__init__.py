"""adaptkit's files in other tools: PEFT adapter folders (``peft``) and ONNX graphs (``onnx``); experiment trackers
are :mod:`adaptkit.training.tracking`. Each needs its optional extra and says which one when it is missing."""
