"""Training: one resumable run (`train.fit`) and k-fold cross-validation (`cv.run_cv`)."""
