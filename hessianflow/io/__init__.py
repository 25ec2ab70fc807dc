"""Files: atomic writes and safe loading of checkpoints (:mod:`~hessianflow.io.checkpoint`), the scripts'
checkpoint format (:mod:`~hessianflow.io.checkpoint_format`) and the eigenvalue history files
(:mod:`~hessianflow.io.history`)."""
