"""Training with second-order information: the ABSA controller, the training and test loops, adversarial
examples, eigenvalue tracking, and the scripts' data sets and models."""
