"""Calibration and evaluation data sources, preprocessed with the model's own data config."""
from vitquant.calibration.data import CalibrationSet, LabeledSet, data_config_for, load_calibration, load_labeled
