"""nr eval: FID, sFID, Inception Score, precision and recall as OpenAI's ADM evaluator computes them,
in PyTorch (torch-fidelity's TF-ported Inception), and reference batches at any size.

Modules: `inception` (the feature extractor and its weights), `metrics` (the math), `inputs` (sample
folders, .npz files and image folders as uint8 images), `features` (batched extraction),
`reference` (ADM-format reference .npz files, read and written), `reference_builder` (`nr eval
reference`: reference batches at any size), `evaluate` (`nr eval`: the whole run).
"""
