"""Reference csPCa model: data from the simulator, a small 3D U-Net, ONNX export, evaluation.

* data.py     -- render training cases (T2W, ADC, high-b DWI) and their voxel ground truth on the model grid
* model.py    -- the network (torch; training only, the agent runs the exported ONNX)
* train.py    -- training loop (`python -m scanside.training.cspca.train`)
* export.py   -- ONNX export, torch/ONNX parity, manifest + model card into engines/models/
* metrics.py  -- AUROC/AP/ranking score (picai-eval), ECE, lesion detection
* evaluate.py -- held-out evaluation through the runtime path (DICOM -> agent -> ONNX Runtime)
"""
