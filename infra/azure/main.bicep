// orch on Azure ML: workspace + its storage, Key Vault, container registry, workspace-based Application Insights
// (on a Log Analytics workspace), a GPU compute cluster with a system-assigned identity, the role assignments that
// let that identity read Key Vault secrets (the HF token, read by jobs at run time), pull images and read/write
// blob data (inputs, the workspace cache),
// and the submitter's AzureML Data Scientist role on the workspace.
//
// Validated in CI (tests/test_infra_bicep.py) by pycep-parser and `checkov --framework bicep`. The skip-list: the
// few checks this file does not meet on purpose, each skipped with its reason (`//checkov:skip=ID:reason`) as the
// first lines inside the resource it concerns; any other failed check fails the test.
//
//   az deployment group create -g <rg> -f infra/azure/main.bicep -p prefix=orch
//
// Outputs are the names `orch config set` needs (see README.md).

@description('Short lowercase prefix for resource names (3-10 letters/digits).')
@minLength(3)
@maxLength(10)
param prefix string = 'orch'

@description('Region of every resource.')
param location string = resourceGroup().location

@description('GPU VM size of the training cluster.')
param gpuVmSize string = 'Standard_NC24ads_A100_v4'

@description('Most nodes of the cluster (it scales to 0 when idle).')
param maxNodes int = 2

@description('Low-priority (spot) nodes: cheaper, may be preempted.')
param lowPriority bool = false

@description('Object id of the user or group that runs `orch submit` (empty: none). Gets AzureML Data Scientist on the workspace and Key Vault Secrets Officer on the vault.')
param submitterPrincipalId string = ''

@description('Kind of principal submitterPrincipalId names.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param submitterPrincipalType string = 'User'

@description('Days the Log Analytics workspace behind Application Insights keeps data.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

var suffix = uniqueString(resourceGroup().id, prefix)
var storageName = toLower(take('${prefix}st${suffix}', 24))
var kvName = toLower(take('${prefix}-kv-${suffix}', 24))
var acrName = toLower(take('${prefix}acr${suffix}', 50))
var wsName = '${prefix}-ws'
var logName = '${prefix}-log-${suffix}'
var computeName = 'gpu-cluster'

// Built-in role definition ids.
var kvSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'
var kvSecretsOfficer = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
var acrPull = '7f951dda-4ed3-4680-a7ca-43fe172d538d'
var blobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
var amlDataScientist = 'f6c7c914-8db3-469d-8ca1-694a8f32e121'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  //checkov:skip=CKV_AZURE_35:public by design: no VNet here; clusters and `orch submit` reach it over HTTPS with Entra ID
  //checkov:skip=CKV_AZURE_206:LRS on purpose: snapshots/outputs are reproducible from the workflow; cheapest, in every region
  //checkov:skip=CKV_AZURE_43:false positive: the name is var storageName (3-24 lowercase letters/digits), which checkov cannot evaluate
  name: storageName
  location: location
  sku: { name: 'Standard_LRS' }
  kind: 'StorageV2'
  properties: {
    // Flat namespace, on purpose (README.md, "Storage namespace"): Azure ML does not support hierarchical namespace
    // on a workspace's default storage account, and orch writes its result outputs with output mode `upload`, so
    // no job relies on an atomic directory rename over the blobfuse mount.
    isHnsEnabled: false
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    supportsHttpsTrafficOnly: true
  }
}

// Deleted or overwritten blobs (code snapshots, job outputs, datastore files) stay recoverable for 7 days.
resource storageBlob 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: { enabled: true, days: 7 }
    containerDeleteRetentionPolicy: { enabled: true, days: 7 }
  }
}

resource kv 'Microsoft.KeyVault/vaults@2023-07-01' = {
  //checkov:skip=CKV_AZURE_109:firewall Allow: jobs read hf-token from the public cluster; RBAC (Secrets User) gates every read
  //checkov:skip=CKV_AZURE_189:public by design: no VNet/private endpoint here; jobs and the submitter reach it over HTTPS
  //checkov:skip=CKV_AZURE_110:no purge protection: holds only the re-settable HF token; tear-down must purge the name
  //checkov:skip=CKV_AZURE_42:soft delete is on (7 days); the check also wants purge protection, declined (CKV_AZURE_110)
  name: kvName
  location: location
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
  }
}

resource acr 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  //checkov:skip=CKV_AZURE_139:public by design: disabling public access needs Premium SKU + a private endpoint
  //checkov:skip=CKV_AZURE_163:image scanning is Defender for Containers, a subscription-level plan, not this template's
  //checkov:skip=CKV_AZURE_166:quarantine needs the Premium SKU; it only holds the environment images Azure ML builds here
  name: acrName
  location: location
  sku: { name: 'Basic' }
  properties: { adminUserEnabled: false }
}

// Workspace-based Application Insights: its data lives in this Log Analytics workspace (classic, standalone
// components are retired).
resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logName
  location: location
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: logRetentionDays
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${prefix}-ai'
  location: location
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    IngestionMode: 'LogAnalytics'
  }
}

resource ws 'Microsoft.MachineLearningServices/workspaces@2024-10-01' = {
  //checkov:skip=CKV_AZURE_243:public workspace (publicNetworkAccess Enabled): a private endpoint needs a VNet this template lacks
  name: wsName
  location: location
  identity: { type: 'SystemAssigned' }
  properties: {
    friendlyName: wsName
    storageAccount: storage.id
    keyVault: kv.id
    containerRegistry: acr.id
    applicationInsights: insights.id
    publicNetworkAccess: 'Enabled'
  }
}

resource gpu 'Microsoft.MachineLearningServices/workspaces/computes@2024-10-01' = {
  parent: ws
  name: computeName
  location: location
  identity: { type: 'SystemAssigned' }
  properties: {
    computeType: 'AmlCompute'
    properties: {
      vmSize: gpuVmSize
      vmPriority: lowPriority ? 'LowPriority' : 'Dedicated'
      scaleSettings: { minNodeCount: 0, maxNodeCount: maxNodes, nodeIdleTimeBeforeScaleDown: 'PT15M' }
      osType: 'Linux'
    }
  }
}

// The cluster's identity reads secrets (hf-token) at run time: Key Vault Secrets User, nothing more.
resource computeKvRead 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: kv
  name: guid(kv.id, gpu.id, kvSecretsUser)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', kvSecretsUser)
    principalId: gpu.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource computeAcrPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: acr
  name: guid(acr.id, gpu.id, acrPull)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPull)
    principalId: gpu.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The cluster's identity reads inputs and keeps orch's workspace cache (orch-cache/: finished passes, training
// checkpoints) in the workspace storage: Storage Blob Data Contributor.
resource computeBlobWrite 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: storage
  name: guid(storage.id, gpu.id, blobDataContributor)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobDataContributor)
    principalId: gpu.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The person (or group) running `orch submit`: AzureML Data Scientist on the workspace lets them submit and cancel
// jobs, read job logs and outputs, models and environments, and use the workspace's MLflow tracking; it grants no
// role assignments and no workspace/compute creation or deletion.
resource submitterWs 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(submitterPrincipalId)) {
  scope: ws
  name: guid(ws.id, submitterPrincipalId, amlDataScientist)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', amlDataScientist)
    principalId: submitterPrincipalId
    principalType: submitterPrincipalType
  }
}

// The submitter may set the token once (`az keyvault secret set ... --name hf-token`).
resource submitterKv 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(submitterPrincipalId)) {
  scope: kv
  name: guid(kv.id, submitterPrincipalId, kvSecretsOfficer)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', kvSecretsOfficer)
    principalId: submitterPrincipalId
    principalType: submitterPrincipalType
  }
}

output subscription_id string = subscription().subscriptionId
output resource_group string = resourceGroup().name
output workspace_name string = ws.name
output compute string = gpu.name
output key_vault_url string = kv.properties.vaultUri
output container_registry string = acr.name
output storage_account string = storage.name
output application_insights string = insights.name
output log_analytics_workspace string = logs.name
