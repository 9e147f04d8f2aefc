// orch on Azure ML: workspace + its storage, Key Vault, container registry, Application Insights, a GPU compute
// cluster with a system-assigned identity, and the role assignments that let that identity read Key Vault secrets
// (the HF token, read by jobs at run time) and pull images / read data.
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

@description('Object id of the user/service principal that submits jobs (gets Key Vault secret officer to set the token).')
param submitterObjectId string = ''

var suffix = uniqueString(resourceGroup().id, prefix)
var storageName = toLower(take('${prefix}st${suffix}', 24))
var kvName = toLower(take('${prefix}-kv-${suffix}', 24))
var acrName = toLower(take('${prefix}acr${suffix}', 50))
var wsName = '${prefix}-ws'
var computeName = 'gpu-cluster'

// Built-in role definition ids.
var kvSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'
var kvSecretsOfficer = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
var acrPull = '7f951dda-4ed3-4680-a7ca-43fe172d538d'
var blobDataReader = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageName
  location: location
  sku: { name: 'Standard_LRS' }
  kind: 'StorageV2'
  properties: {
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    supportsHttpsTrafficOnly: true
  }
}

resource kv 'Microsoft.KeyVault/vaults@2023-07-01' = {
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
  name: acrName
  location: location
  sku: { name: 'Basic' }
  properties: { adminUserEnabled: false }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${prefix}-ai'
  location: location
  kind: 'web'
  properties: { Application_Type: 'web' }
}

resource ws 'Microsoft.MachineLearningServices/workspaces@2024-10-01' = {
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

resource computeBlobRead 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: storage
  name: guid(storage.id, gpu.id, blobDataReader)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobDataReader)
    principalId: gpu.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The submitter may set the token once (`az keyvault secret set ... --name hf-token`).
resource submitterKv 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(submitterObjectId)) {
  scope: kv
  name: guid(kv.id, submitterObjectId, kvSecretsOfficer)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', kvSecretsOfficer)
    principalId: submitterObjectId
  }
}

output subscription_id string = subscription().subscriptionId
output resource_group string = resourceGroup().name
output workspace_name string = ws.name
output compute string = gpu.name
output key_vault_url string = kv.properties.vaultUri
output container_registry string = acr.name
output storage_account string = storage.name
