// Placeholder: the BatchNorm kernels land here (issue 5).
