"""HTTP routers (thin: auth → service → response schema), one module per resource."""
