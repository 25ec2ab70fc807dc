"""The solvers: linear operators and their algebra, eigenvalues (Lanczos, power iteration), traces,
diagonals, spectral densities and linear solves. They know nothing of models: every function takes a
:class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric tensor."""
