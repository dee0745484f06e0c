"""Credit fidelity: each credit strategy's per-token credit measured against Monte-Carlo
ground truth (`attnrl fidelity`).

    chunks.py    where a response is cut (sentences, else equal token chunks; at most K)
    values.py    prefix values V(b_j) from k sampled continuations; D_j = V(b_{j+1}) - V(b_j)
    weights.py   every strategy's gamma_t from the trainer's loss forward (QK heads cross-fit)
    stats.py     S (share of credit on decisive chunks), rank correlation, the permutation
                 null, intervals over problems, Holm
    report.py    per-response records, the tests against both nulls, the summary
    render.py    the table and the picture
    pipeline.py  the command's steps; cli.py its arguments and checks
"""
