"""Reference 3D ResNet sequence classifier (images only): T2WI_nan, T2WI_fs, DWI_Low, DWI_High, ADC, other.

Modules: protocols (randomised exam protocols, train and held-out variants), data (render-path
training set, cached to disk), model (the 3D ResNet), train, export (ONNX + manifest + card),
evaluate (the runtime path on simulated DICOM), retrain (a site's labelled DICOM).
Runtime inference lives in scanside.engines.tasks.image_label (no torch).
"""
