"""What the KV-outer implementations (pallas, cuda) share, owned by neither: the work list
that inverts the selection (key tile -> the queries that chose it) and the slot partials'
chunking and log-sum-exp merge."""
