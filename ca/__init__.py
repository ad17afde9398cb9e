"""The cluster certificate authority: the only holder of the mesh's root key.

- `ca.admission`: the pure decision "may the agent of node N have identity I", from what the
  Kubernetes TokenReview API said about the agent's token and the pods scheduled now.
- `ca.server`: `ameshctl ca serve`, the HTTPS service agents send CSRs to (port 15012).
- `ca.client`: the agent's side, a RemoteIssuer for the CertificateManager.
"""
