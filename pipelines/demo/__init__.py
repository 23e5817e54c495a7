"""The demo model's code, apart from the product: the shapes corpus (``procedural``), prompt
adherence scoring (``adherence``), loss curves (``loss_curves``) and the training orchestration
(``train``, run by ``python -m jobs.train_demo``). Its architecture, training loops and shipped
weights are in ``workers.demo``; the generation and encoding jobs never import this package (only the CLI's
``demo`` and ``adherence`` verbs and ``jobs.train_demo`` do)."""
