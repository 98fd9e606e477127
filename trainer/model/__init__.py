"""Model and losses: the MQSA encoder, one objective per mode (paper, catalogue), the softmax and
TED losses, the chunked log-partition with its block backends (torch or the CPU kernel) and the
transition term."""
