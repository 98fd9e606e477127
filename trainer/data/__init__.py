"""Data and batches: the prepared data read into users' sequences (in memory or streamed per
rank), the TED teacher and the negative samplers built from it, and each step's host-side
``StepBatch`` with the prefetching reader that moves it to the device."""
