"""What MixNN recomputes before every epoch after warm-up, from one forward pass over the pool:

    forward      the evaluation pass: logits and features per sample
    gmm          clean probability: a two-component 1-D Gaussian mixture over the losses
    neighbours   each sample's K nearest other samples in feature space
    weights      the mixing weights λ, β (eq. 10-11) and the ablations' weights
    partners     PartnerTable: each anchor's partners and weights, validated once
    targets      label correction: soft targets by exponential moving average (eq. 12)
    refresh      the refresh itself, tying them together
"""
