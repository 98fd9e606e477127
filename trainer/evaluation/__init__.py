"""Evaluation: full ranking with the train history masked, HR/NDCG@K, and the non-learned
baselines scored the same way."""
