"""Reference zonal prostate model (prostate-zones-reference): axial T2W -> background / TZ / PZ,
trained from scratch on simulated phantoms (training/zones/{spec,data,model,train,export,evaluate}.py)."""
