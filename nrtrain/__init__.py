"""nrtrain: training and sampling on packed latents. Start at train.py (`nr train`) or sample.py
(`nr sample`); the README's "Layout of the code" lists the rest by stage."""
