"""adaptkit's files and runs in other tools: PEFT adapter folders (``peft``), ONNX graphs (``onnx``) and experiment
trackers (``tracking``). Each needs its optional extra and says which one when it is missing."""
