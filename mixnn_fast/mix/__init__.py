"""The fused mixer: gather anchors and partners, convex combination, normalisation, layout and
dtype in one pass over memory (``mixer``), and the same operation in plain torch (``reference``),
the test oracle and benchmark baseline."""
