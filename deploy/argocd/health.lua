-- Argo CD health check for dpc-operator.io ConnectionOverride (also fits DpcAccount and
-- ClusterDpcAccount, which have a Ready condition too).
--   Progressing  until the operator has observed the current generation, and while a write
--                is on its way (Creating, Updating, RateLimited, ApiUnavailable, Deleting)
--   Healthy      Ready is True
--   Degraded     Ready is False for a reason that waits for a person (a wrong spec, a missing
--                Secret, refused credentials, a conflict, drift that is only reported, ...)
--   Suspended    the object is paused (dpc-operator.io/paused: "true")
local hs = { status = "Progressing", message = "Waiting for dpc-operator" }

-- JSON null may arrive as nil or as a userdata sentinel.
local function present(v)
  return v ~= nil and type(v) ~= "userdata"
end

local terminal = {
  InvalidSpec = true,
  SecretNotFound = true,
  SecretKeyMissing = true,
  AccountNotReady = true,
  AccountNotAllowed = true,
  CredentialsRejected = true,
  ParentNotFound = true,
  ApiRejected = true,
  Conflict = true,
  Drifted = true,
}

local metadata = obj.metadata or {}
local annotations = metadata.annotations
if present(annotations) and annotations["dpc-operator.io/paused"] == "true" then
  hs.status = "Suspended"
  hs.message = "Reconciliation is paused (dpc-operator.io/paused)"
  return hs
end

local status = obj.status
if not present(status) then
  return hs
end
local generation = metadata.generation
if present(generation) then
  if not present(status.observedGeneration) or status.observedGeneration < generation then
    hs.message = "Waiting for dpc-operator to observe generation " .. tostring(generation)
    return hs
  end
end

local ready = nil
if present(status.conditions) then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
  end
end
if ready == nil then
  return hs
end
if present(generation) and present(ready.observedGeneration) and ready.observedGeneration < generation then
  hs.message = "Waiting for dpc-operator to observe generation " .. tostring(generation)
  return hs
end

local message = ready.message
if not present(message) or message == "" then
  message = ready.reason
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message
elseif ready.reason == "Paused" then
  hs.status = "Suspended"
  hs.message = message
elseif terminal[ready.reason] then
  hs.status = "Degraded"
  hs.message = ready.reason .. ": " .. tostring(message)
else
  hs.status = "Progressing"
  hs.message = tostring(ready.reason) .. ": " .. tostring(message)
end
return hs
