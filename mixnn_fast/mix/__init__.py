"""The fused mixer: gather anchors and partners, convex combination, normalisation, layout and
dtype in one pass over memory.  ``mixer`` holds the public functions, which call the torch
operators registered in ``op`` (``mixnn_fast::mix_images``, ``mixnn_fast::mix_targets``);
``core`` their checks and the kernel call, ``inputs`` the zero-copy import of NumPy and DLPack
arrays, ``outputs`` the pooled huge-page output buffers, ``trusted`` the loader's path for
batches validated upstream, and ``reference`` the same operation in plain torch, the test
oracle and benchmark baseline."""
