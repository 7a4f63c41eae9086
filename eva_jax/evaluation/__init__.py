"""Evaluation of trained encoders: linear probe and k-NN, MIM visualization, training curves."""
