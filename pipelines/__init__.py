"""pipelines: what runs several stages or a Ray Data job: encode.py (`nr encode` on Ray Data) and
demo.py (`nr demo`, image folder to samples)."""
