"""Self-supervised pretraining of the tokenizer's encoder: DINO self-distillation (``dino``), its multi-crop views
(``augment``), the kNN monitor (``knn``) and the ``Task`` the shared trainer runs (``task``); CLI: `digit encoder`."""
