"""Layer 1, decoding: DICOM headers, vendor conventions, volumes, series assembly, header rules. No state, no configuration."""
