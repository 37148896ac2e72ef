"""FastAPI service serving the MNIST LSTM digit classifier and the stateful echo RNN."""
