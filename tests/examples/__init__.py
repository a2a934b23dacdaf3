"""Tests of the examples (data generator, CTR DNN, two-tower) and of the serving benchmark helpers."""
