"""Research without hftbacktest: replay of catalog days, fair-value evaluation, micro-price,
training and calibration."""
