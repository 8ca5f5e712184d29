"""The schemathesis hooks of tests/it/openapi (SCHEMATHESIS_HOOKS=hooks): each registers itself."""

import sign_webhooks  # noqa: F401
import warm_fronts  # noqa: F401
