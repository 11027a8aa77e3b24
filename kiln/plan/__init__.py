"""Training at scale, on paper: collectives model, cluster profiles, parallel plans, their time and cost."""
